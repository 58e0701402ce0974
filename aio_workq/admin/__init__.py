"""What the command line and the dashboard both do with a broker: queue depths (the management
API, else passive declares), dead-letter filters and ids, the schedules' status as rows.

No Click and no web framework here: `aio_workq.cli` and `aio_workq.dashboard` are thin layers
over these modules.
"""

from __future__ import annotations

from ._errors import AdminError as AdminError
from ._errors import ManagementAPIError as ManagementAPIError

__all__ = ("AdminError", "ManagementAPIError")

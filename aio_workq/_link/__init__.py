"""Connections, channels and declarations: the link to the broker that publishing and
consuming share."""

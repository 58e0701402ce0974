"""The wire layer: AMQP frames on the socket, the fast path's demux and writer, and the seams
to aiormq."""

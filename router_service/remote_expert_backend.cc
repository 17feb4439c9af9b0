// Filled in by the remote-backend work.

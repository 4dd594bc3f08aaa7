"""The vendgate wire protocol, sans-I/O."""

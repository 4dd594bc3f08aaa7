"""Tests of the gateway foundation: errors, configuration, logging and the command line."""

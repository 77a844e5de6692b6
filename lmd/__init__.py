"""The `lmd` command line and the one settings object shared by the CLI, the API and the workers."""

"""One module per `lvdflow` subcommand (see lvdflow/cli.py for the contract)."""

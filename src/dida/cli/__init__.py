"""Command-line entry points: `dida <subcommand>`; one small module per subcommand."""

"""The `d3qe` command: each subcommand lives with its tier; this package dispatches to them and holds the demo."""

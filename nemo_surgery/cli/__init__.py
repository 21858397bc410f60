"""The command line: a click group (``main``) and one thin module per command."""

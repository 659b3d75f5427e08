"""The `vincie` command."""

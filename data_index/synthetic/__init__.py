"""The synthetic video world and `vincie data synth`."""

"""Planning a run before it runs (`vitscale plan`): estimate.py puts the numbers together from the
config tree, activations.py models a micro-batch's activation memory, cli.py prints them."""

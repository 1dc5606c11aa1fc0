"""One module per bench/compare scenario; main.discover() finds them."""

"""The run: every part built from the config once (run.py), the loop (loop.py), and the commands
that serve and evaluate models from the same config (serve.py, evaluate.py)."""

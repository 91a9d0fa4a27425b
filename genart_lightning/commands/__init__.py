"""`genart` subcommands beside LightningCLI's fit/validate/test/predict; one module each.

Each module exposes `register(subparsers) -> None`, adding its parser with `func=run`.
"""

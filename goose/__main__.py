"""``python -m goose`` runs the command line."""
from .cli import main

main()

"""Entry point of the `cityhub` console script."""

from __future__ import annotations

from cityhub.cli.main import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`python -m cli ...` runs the `tidal` command line (`tidal up` starts its services so)."""

from cli.main import app

if __name__ == "__main__":
    app(prog_name="tidal")

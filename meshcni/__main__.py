"""`python -m meshcni ...` is the `meshcni` command (how the lab starts its own agent from any venv)."""

from meshcni.cli.main import main

if __name__ == "__main__":
    main()

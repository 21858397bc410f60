"""``python -m nemo_surgery``: the same command line as the ``nemo-surgery`` script."""

from nemo_surgery.cli.main import main

if __name__ == "__main__":
    main()

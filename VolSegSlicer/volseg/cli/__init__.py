"""The ``volseg`` command line: argument parsing, help texts, one function per command."""

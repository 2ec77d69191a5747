"""One module per ``fastdd`` command: each parses its options into configs, calls one library function and prints.

The options of distill and experts are derived from the config dataclasses (:mod:`fastdd.commands.options`).
"""

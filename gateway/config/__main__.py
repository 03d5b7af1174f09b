"""`python -m gateway.config` prints the commented example (config/gateway.toml)."""

from .render import example

print(example(), end="")

"""Entry points: the `marquee` CLI, the dev stack and the embedded servers it starts."""

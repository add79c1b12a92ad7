"""User-facing errors: one line that names the problem and the fix.

Internal invariants use `assert`; anything a user can cause (a config, a shard, a CLI flag, a
checkpoint) raises a subclass of `VitscaleError`, which the entry points print as one line.
"""


class VitscaleError(Exception):
    """A problem the user can fix; str(error) is the whole message."""

    exit_code = 2


class ConfigError(VitscaleError):
    """A bad config key or value. `key` is the dotted path, e.g. `model.image_size`."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        self.key, self.problem, self.fix = key, problem, fix
        message = f"config {key}: {problem}" if key else f"config: {problem}"
        super().__init__(f"{message} ({fix})" if fix else message)


class DataError(VitscaleError):
    """Unreadable or malformed training data (shards, images, labels)."""


class CheckpointError(VitscaleError):
    """A checkpoint that cannot be found, read or trusted."""

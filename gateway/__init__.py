"""git-gateway: a Git-over-SSH gateway for push-to-deploy platforms."""

import warnings as _warnings

# The one version source: pyproject.toml reads it (setuptools `attr`), `--version` prints it.
__version__ = "0.1.0"


def quiet_dependencies() -> None:
    """Filter the dependency warnings nobody can act on, at their source only.

    asyncssh still implements DSA and other algorithms that cryptography deprecates (the
    gateway never offers them), and cryptography warns when asyncssh merely names them at
    import: ten lines before every CLI command and in every log. Only warnings raised from
    asyncssh's own modules are filtered; every other one goes through logging (gateway.logs).
    """
    # cryptography's CryptographyDeprecationWarning derives from UserWarning; naming it would
    # import cryptography here, and the hooks import this package without site-packages.
    for category in (DeprecationWarning, PendingDeprecationWarning, UserWarning):
        _warnings.filterwarnings("ignore", category=category, module=r"asyncssh(\.|$)")


# Before any of our modules imports asyncssh.
quiet_dependencies()

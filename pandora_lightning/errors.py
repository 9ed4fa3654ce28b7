"""The one project error type: every message a user can cause (config, data, checkpoint, CLI) is a
`PandoraError` that names what is wrong and how to fix it; the CLI prints it as one line."""


class PandoraError(ValueError):
    """A recipe, manifest, checkpoint, file or argument that cannot be used as written."""

"""The local web app (`python -m eval.app`): `analyzer` runs requests through the library,
`page` lays out the Gradio page (the `[app]` extra), `demo` prepares its offline models."""

"""Run lifecycle: the LightningCLI subclass, resume, provenance, atomic checkpoint IO, continued loggers, cluster helpers."""

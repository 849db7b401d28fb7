"""Start the server: load the model once, then serve the API with uvicorn until interrupted."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from voxseg.errors import ConfigError
from voxseg.serve import require_serve_extra

__all__ = ["INSTALLED_MODEL", "load_model", "read_token", "run_server"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALLED_MODEL = ".installed-model"  # in the jobs folder: where a model archive given to serve is installed


def read_token(path: str | Path | None) -> str | None:
    """The bearer token of --token-file (its first line), or None without one; ConfigError when it is empty."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip().splitlines()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot be read ({exc.strerror}); give a file holding the token") \
            from None
    if not token or len(token[0].strip()) < 16:
        raise ConfigError(f"--token-file {path}: give a token of at least 16 characters on its first line, e.g. "
                          "python -c 'import secrets; print(secrets.token_urlsafe(32))' > token")
    return token[0].strip()


def load_model(model: str | Path, jobs_dir: Path, config: Any) -> Any:
    """The Predictor of a work directory, an installed model folder, an nnU-Net model folder, or a model
    archive (.zip, installed into the jobs folder first through `install_archive`)."""
    from voxseg.infer.predictor import Predictor

    model = Path(model)
    if model.suffix == ".zip" and model.is_file():
        from voxseg.infer.archive import install_archive

        model = install_archive(model, jobs_dir / INSTALLED_MODEL, force=True)
    return Predictor.from_workdir(model, config)


def run_server(model: str | Path, settings: Any, config: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load `model` with `config` (an InferConfig) and serve it on host:port with `settings` (ServeSettings)."""
    require_serve_extra()
    import uvicorn

    from voxseg.serve.app import create_app

    settings.jobs_dir.mkdir(parents=True, exist_ok=True)
    predictor = load_model(model, settings.jobs_dir, config)
    app = create_app(predictor, settings, Path(model).name)
    where = f"http://{host}:{port}"
    print(f"serving {model} on {where} ({predictor.device}; jobs in {settings.jobs_dir}; "
          f"token {'required' if settings.token else 'not required'}); viewer at {where}/, API docs at {where}/docs",
          flush=True)
    if host not in LOOPBACK and not settings.token:
        print(f"warning: listening on {host} without a token: anyone who reaches this port can send jobs and read "
              "results; give --token-file and put TLS in front", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)

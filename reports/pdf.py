"""HTML -> PDF with headless Chromium when installed, else WeasyPrint (``synthgate[pdf]``)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from synthgate.errors import MissingDependencyError, SynthgateError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_args(browser: str, profile: str) -> list[str]:
    # the flags that keep Chromium off the network and quiet on a closed machine
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}"]


def html_to_pdf(html_path: Path, pdf_path: Path, engine: str = "auto") -> str:
    """Write ``pdf_path``; return the engine used (``chromium`` or ``weasyprint``)."""
    html_path, pdf_path = Path(html_path).resolve(), Path(pdf_path).resolve()
    browser = find_browser() if engine in ("auto", "chromium") else None
    if browser:
        with tempfile.TemporaryDirectory() as profile:
            tmp = pdf_path.with_name(f".{pdf_path.name}.partial")
            cmd = chromium_args(browser, profile) + ["--no-pdf-header-footer", f"--print-to-pdf={tmp}",
                                                    html_path.as_uri()]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0 or not tmp.exists():
                raise SynthgateError(f"Chromium could not print the report (exit {done.returncode})", html_path)
            tmp.replace(pdf_path)
        return "chromium"
    if engine == "chromium":
        raise MissingDependencyError("no Chromium found (looked for " + ", ".join(BROWSERS) + ")")
    try:
        import weasyprint
    except ImportError as exc:
        raise MissingDependencyError(
            'PDF needs headless Chromium (e.g. `apt install chromium`) or WeasyPrint: pip install "synthgate[pdf]"'
        ) from exc
    tmp = pdf_path.with_name(f".{pdf_path.name}.partial")
    weasyprint.HTML(filename=str(html_path)).write_pdf(str(tmp))
    tmp.replace(pdf_path)
    return "weasyprint"

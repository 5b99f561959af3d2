"""ControlNet annotator weight files on disk: what `annotator_dir:` in models.yaml names.

Torch-free and cheap, like app.upscaler_files: the registry runs it at start-up (and on every
reload) and only looks at which files are there; app.engine.annotators loads them (weights
only) when a preprocessor first needs one.

The files keep the names sd-webui-controlnet and the `lllyasviel/Annotators` Hub repository
give them (`ControlNetHED.pth`, `sk_model.pth`, `body_pose_model.pth`,
`dpt_hybrid-midas-501f0c75.pt`, ...). They are found
flat in the folder (a download of the Hub repository), or where the extension keeps them:
`downloads/<kind>/<file>` under its `annotator/` folder, or `<kind>/<file>` under
`annotator/downloads/`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# file name -> the sub-folder of the extension's annotator/downloads it sits in
ANNOTATOR_FILES: dict[str, str] = {
    "ControlNetHED.pth": "hed",
    "sk_model.pth": "lineart",
    "sk_model2.pth": "lineart",
    "table5_pidinet.pth": "pidinet",
    # the anime line nets
    "netG.pth": "lineart_anime",
    "erika.pth": "manga_line",
    "body_pose_model.pth": "openpose",
    "dpt_hybrid-midas-501f0c75.pt": "midas",
}


@dataclass(frozen=True)
class AnnotatorFiles:
    """The annotator folder (None: `annotator_dir:` not set) and the known weight files found
    in it, by file name."""

    folder: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path | None:
        return self.files.get(name)

    def missing(self, module: str, name: str) -> str:
        """Why `module` cannot run: its file `name` is not here (for an error's rule)."""
        if self.folder is None:
            return (f"{module} needs {name} in an annotator folder, and models.yaml sets no "
                    "annotator_dir")
        # (the folder is not named: answers never show the server's paths)
        return f"{module} needs {name} in models.yaml's annotator_dir; it is not there"


def _candidates(folder: Path, name: str) -> list[Path]:
    kind = ANNOTATOR_FILES[name]
    return [folder / name, folder / kind / name, folder / "downloads" / kind / name]


def discover_annotators(folder: Path | None) -> AnnotatorFiles:
    """The known annotator files present in `folder` (first of: flat, `<kind>/`,
    `downloads/<kind>/`). A folder that does not exist is the caller's to refuse (app.registry
    does)."""
    if folder is None:
        return AnnotatorFiles()
    found = {}
    for name in ANNOTATOR_FILES:
        for path in _candidates(folder, name):
            if path.is_file():
                found[name] = path.resolve()
                break
    return AnnotatorFiles(folder=folder, files=found)

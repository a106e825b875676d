"""Flags a stage would silently ignore are refused at parse time, before any work."""

from __future__ import annotations

import pytest

from mmfusion.config import ConfigError
from mmfusion.training import pretrain_vit


@pytest.mark.parametrize("flags, named", [(["--n-layer", "3"], "--n-layer"), (["--image-size", "32"], "--image-size"),
                                          (["--preset", "vit-small-patch16-224"], "--n-embd"),
                                          (["--attention-init", "normal"], "--attention-init")])
def test_init_from_refuses_architecture_flags_it_would_ignore(flags, named, tmp_path):
    with pytest.raises(ConfigError, match=f"--init-from brings its own architecture, so .*{named}"):
        pretrain_vit.parse(["--init-from", "vit-tiny", "--output-dir", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_init_from_alone_and_size_flags_alone_parse(tmp_path):
    stage, _ = pretrain_vit.parse(["--init-from", "vit-tiny", "--output-dir", str(tmp_path / "a")])
    assert stage.init_from == "vit-tiny" and stage.vit == pretrain_vit.DEFAULT_VIT
    stage, _ = pretrain_vit.parse(["--n-layer", "3", "--output-dir", str(tmp_path / "b")])
    assert stage.vit.n_layer == 3 and stage.init_from is None

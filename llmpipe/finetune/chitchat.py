"""The `chitchat` stage: the embedded chat data, the wheel of `chitchat-dataset==0.9.0` from PyPI (MIT,
about 7,000 human conversations in `chitchat_dataset/dataset.json`), put at
data/sources/chitchat_dataset-0.9.0-py3-none-any.whl.

Fetched like the demo corpus (llmpipe/data/demo.py): pip downloads the wheel without installing it, the
sha256 is checked before it is put in place, `chitchat.local_copy` serves offline machines. The
chat_data stage reads the JSON straight out of the wheel (llmpipe/finetune/conversations.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from llmpipe.data.demo import PackageFileConfig, fetch_package_file

if TYPE_CHECKING:
    from llmpipe.stages import StageContext

CHITCHAT_REQUIREMENT = "chitchat-dataset==0.9.0"
CHITCHAT_SHA256 = "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"  # 8,105,664 bytes


class ChitchatConfig(PackageFileConfig):
    """The `chitchat` section of params.yaml."""

    sha256: str = Field(CHITCHAT_SHA256, pattern=r"^[0-9a-f]{64}$",
                        description="the wheel's expected sha256; anything else is refused")


def run(cfg: ChitchatConfig, ctx: StageContext) -> dict[str, float]:
    dest = fetch_package_file(ctx.output("wheel"), CHITCHAT_REQUIREMENT, cfg.sha256, cfg.local_copy, ctx.root,
                              "chitchat")
    return {"wheel_bytes": dest.stat().st_size}

"""Bridges from modkern to other tools. Each submodule imports its tool only when used, so
`import modkern.integrations` needs nothing beyond modkern itself.

- `modkern.integrations.mergekit`: MoD as a mergekit merge method (`merge_method: mod`);
  needs the extra `pip install "modkern[mergekit]"`.
"""

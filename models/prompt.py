"""Prompt cleaning shared by the pipelines: diffusers' `prompt_clean` (pipeline_wan.py).

diffusers runs `ftfy.fix_text` first when ftfy is installed, then `html.unescape` twice,
strips, and collapses every whitespace run to one space. This module uses ftfy the same
way when it is importable and does not depend on it. Without ftfy, what ftfy would repair
passes through unchanged: mojibake (UTF-8 decoded as Latin-1: "cafÃ©" for "café"), the
quotes and ligatures it normalises, terminal escapes and control characters. The result
then equals diffusers' output on a machine without ftfy and may differ from it on a machine
with ftfy (ordinary, well-formed prompts come out the same).
"""

import html
import re

try:
  import ftfy
except ImportError:  # optional, as in diffusers (`is_ftfy_available`)
  ftfy = None

_WHITESPACE = re.compile(r"\s+")


def basic_clean(text: str) -> str:
  """ftfy repair (if installed), HTML entities unescaped twice, outer whitespace stripped."""
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text))
  return text.strip()


def whitespace_clean(text: str) -> str:
  """Every whitespace run (spaces, tabs, newlines, Unicode spaces) -> one space, stripped."""
  return _WHITESPACE.sub(" ", text).strip()


def prompt_clean(text: str) -> str:
  """diffusers' Wan `prompt_clean`: `whitespace_clean(basic_clean(text))`."""
  return whitespace_clean(basic_clean(text))

"""The vocabulary: ten colour tokens and a handful of markers.

Colour c (0..9) is token c, so a grid of colours is already a grid of tokens.
"""

NUM_COLORS = 10
PAD = 10  # right padding; never a target
BOS = 11  # start of a task
IN = 12  # an input grid follows
OUT = 13  # an output grid follows
NEWLINE = 14  # closes every grid row
END = 15  # closes the answer (the last output grid)
VOCAB_SIZE = 16

NAMES = {PAD: "<pad>", BOS: "<bos>", IN: "<in>", OUT: "<out>", NEWLINE: "<nl>", END: "<end>"}


def token_name(token: int) -> str:
  return str(token) if 0 <= token < NUM_COLORS else NAMES.get(token, f"<{token}?>")

"""The rule that marks an answer right or wrong, stated once.

An answer is **right** when one of the expected key phrases appears in it as a whole run of
words after normalising both: lower case, every run of letters and digits a word, everything
else (punctuation, spacing, markdown) dropped. "Paris" matches "The capital of France is
Paris." but not "Parisian"; "silver otter" matches "…is the Silver Otter!" but not
"silver-grey otter". Number words and digits count as the same word ("seven" = "7").
"""

from __future__ import annotations

import re

_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "twenty": "20",
}


def normalise(text: str) -> list[str]:
    """The words of ``text``: lower case, letters and digits only, number words as digits."""
    return [_NUMBER_WORDS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def phrase_match(answer: str, phrases: str | list[str] | tuple[str, ...]) -> bool:
    """Whether one of ``phrases`` appears in ``answer`` as a whole run of normalised words."""
    words = normalise(answer)
    for phrase in [phrases] if isinstance(phrases, str) else phrases:
        wanted = normalise(phrase)
        if not wanted:
            continue
        n = len(wanted)
        if any(words[i : i + n] == wanted for i in range(len(words) - n + 1)):
            return True
    return False

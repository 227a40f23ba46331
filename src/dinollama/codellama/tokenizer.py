"""Code Llama's SentencePiece tokenizer with the infilling and ``<step>`` pieces."""

from __future__ import annotations

import os

from sentencepiece import SentencePieceProcessor

_MARKER = "☺"


class InfillingNotSupported(ValueError):
    """The tokenizer has no ``▁<PRE>``/``▁<SUF>``/``▁<MID>``/``▁<EOT>`` pieces."""


class Tokenizer:
    """Same API and ids as the reference tokenizer: bos 1, eos 2, infilling pieces found by name."""

    def __init__(self, model_file: str | os.PathLike | None = None, *, model_proto: bytes | None = None) -> None:
        if model_proto is not None:  # e.g. rebuilt from a GGUF file's metadata
            self.model_file = "<in memory>"
            self.sp_model = SentencePieceProcessor(model_proto=model_proto)
        else:
            if model_file is None or not os.path.isfile(model_file):
                raise FileNotFoundError(f"{model_file}: no such tokenizer model file")
            self.model_file = str(model_file)
            self.sp_model = SentencePieceProcessor(model_file=self.model_file)
        self.n_words = self.sp_model.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp_model.bos_id(), self.sp_model.eos_id(), self.sp_model.pad_id()
        self.prefix_id = self._piece("▁<PRE>")
        self.middle_id = self._piece("▁<MID>")
        self.suffix_id = self._piece("▁<SUF>")
        self.eot_id = self._piece("▁<EOT>")
        self.step_id = self._piece("<step>")
        self._marker_ids = self.sp_model.encode(_MARKER)
        self._marker_is_piece = self._piece(_MARKER) is not None

    @classmethod
    def from_proto(cls, model_proto: bytes) -> Tokenizer:
        return cls(model_proto=model_proto)

    def save(self, path: str | os.PathLike) -> None:
        """Write the SentencePiece model (``tokenizer.model``)."""
        with open(path, "wb") as f:
            f.write(self.sp_model.serialized_model_proto())

    def _piece(self, piece: str) -> int | None:
        i = self.sp_model.piece_to_id(piece)
        return i if i != self.sp_model.unk_id() else None

    @property
    def supports_infilling(self) -> bool:
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    def require_infilling(self) -> None:
        if not self.supports_infilling:
            raise InfillingNotSupported(
                f"{self.model_file}: this model was not trained for infilling (its tokenizer has no "
                "▁<PRE>/▁<SUF>/▁<MID>/▁<EOT> pieces); Code Llama 7B/13B base and instruct are"
            )

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        t = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + t + ([self.eos_id] if eos else [])

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode([tok for tok in t if tok != -1])

    def token_piece(self, t: int) -> str:
        return self.sp_model.id_to_piece(t)

    def encode_infilling(self, s: str) -> list[int]:
        """Encode without SentencePiece's implicit leading space: a marker char is prepended and its
        tokens dropped (2 for the Llama vocabulary, where "☺" is a piece, as the reference does;
        more where the marker falls back to bytes)."""
        return self.sp_model.encode(_MARKER + s)[len(self._marker_ids) :]

    def decode_infilling(self, t: list[int]) -> str:
        """Decode without the implicit leading space (the marker is decoded first, then cut off)."""
        marker = [self._piece(_MARKER)] if self._marker_is_piece else self._marker_ids
        return self.sp_model.decode(marker + list(t))[1:]

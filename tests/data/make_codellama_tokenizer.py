"""Build ``codellama_tokenizer.model`` (test asset) from the Llama 2 tokenizer.

Code Llama 7B/13B/70B use the Llama 2 SentencePiece model plus 16 pieces with ids 32000-32015;
the four infilling pieces sit at their real ids (``▁<PRE>`` 32007, ``▁<SUF>`` 32008, ``▁<MID>`` 32009,
``▁<EOT>`` 32010). The other twelve are placeholders: only their ids matter to these tests.
Run once with protobuf available: ``PYTHONPATH=/path/to/protobuf python make_codellama_tokenizer.py``.
"""

from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

HERE = Path(__file__).parent
ADDED = ["▁<SU", "▁<SUF", "▁<PRE", "▁<M", "▁<MID", "▁<E", "▁<EOT", "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"] + [
    f"<unused_{i}>" for i in range(32011, 32016)
]


def main() -> None:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString((HERE / "llama2_tokenizer.model").read_bytes())
    assert len(proto.pieces) == 32000
    for piece in ADDED:
        proto.pieces.add(piece=piece, score=0.0, type=sp_pb2.ModelProto.SentencePiece.NORMAL)
    (HERE / "codellama_tokenizer.model").write_bytes(proto.SerializeToString())


if __name__ == "__main__":
    main()

"""Sentence-embedding fidelity: how close a compressed encoder's embeddings stay to the original.

Embeddings are mean-pooled over real (unpadded) tokens, as sentence-transformers does for
all-MiniLM-L6-v2. Fidelity is the cosine between each sentence's compressed and original
embedding; agreement also compares the sentence-similarity matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SENTENCES = (
    "The train to the coast leaves every morning at seven.",
    "A quiet library is the best place to read a long novel.",
    "She repaired the bicycle chain with a borrowed tool.",
    "Interest rates rose for the third month in a row.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our team shipped the new release after a week of testing.",
    "Heavy rain flooded the streets near the river overnight.",
    "He practises the violin for an hour before breakfast.",
    "The museum added a wing for modern sculpture.",
    "Compilers translate source code into machine instructions.",
    "A small dog chased the ball across the wet grass.",
    "The election results will be announced on Sunday evening.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The satellite sends images of the polar ice every day.",
    "Please close the window before you leave the room.",
    "Quantized neural networks run faster on small devices.",
)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of token vectors where the mask is 1: [batch, seq, dim] -> [batch, dim]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@dataclass(frozen=True)
class EmbeddingFidelity:
    mean_cosine: float
    min_cosine: float
    similarity_max_abs_diff: float  # between the two sentence-similarity matrices

    def __str__(self) -> str:
        return (
            f"cosine mean {self.mean_cosine:.4f} (min {self.min_cosine:.4f}), "
            f"similarity matrix max diff {self.similarity_max_abs_diff:.4f}"
        )


def fidelity(reference: torch.Tensor, candidate: torch.Tensor) -> EmbeddingFidelity:
    """Compares two [sentences, dim] embedding matrices."""
    ref = torch.nn.functional.normalize(reference.double(), dim=-1)
    cand = torch.nn.functional.normalize(candidate.double(), dim=-1)
    cos = (ref * cand).sum(-1)
    sim_diff = (ref @ ref.T - cand @ cand.T).abs().max()
    return EmbeddingFidelity(float(cos.mean()), float(cos.min()), float(sim_diff))

"""The GPU test-time-training engine: flat parameter store, captured step, students side by side,
and the end-to-end classification pipeline built on it."""
from .engine import PendingBatch, TTTEngine
from .memory import choose_students, count_params, estimate_student_bytes, student_bytes
from .pipeline import BatchResult, ClassifyResult, classify_images, iter_classify_batches
from .program import StudentProgram
from .single_step import EngineStep, make_step
from .store import ParamStore
from .teacher import TeacherLike, class_embeddings

__all__ = ["TTTEngine", "PendingBatch", "StudentProgram", "ParamStore", "choose_students",
           "count_params", "estimate_student_bytes", "student_bytes", "classify_images",
           "iter_classify_batches", "make_step", "EngineStep", "ClassifyResult", "BatchResult", "TeacherLike", "class_embeddings"]

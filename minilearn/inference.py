"""The names of `minilearn.inference` before it was split, from their modules: predictions in
`minilearn.predictions`, `show_results` and `ClassificationInterpretation` in `minilearn.interpret`, the model
summary in `minilearn.model_summary`."""
from .interpret import ClassificationInterpretation, show_results
from .model_summary import ModelSummary, summary
from .predictions import decode_prediction, get_preds, hflip, inference_callbacks, item_to_tensor, predict, tta

__all__ = ['get_preds', 'predict', 'tta', 'hflip', 'show_results', 'summary', 'ModelSummary',
           'ClassificationInterpretation', 'inference_callbacks', 'item_to_tensor',
           'decode_prediction']

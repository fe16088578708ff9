"""Open the black box: attributions per prediction (Captum) and evidence of what each layer learned.

Works on any registered model through `forward_features`, `forward_head` and `named_stages()`.
"""

from layerwise.explain.attribution import METHODS, Attribution, attribute, grad_cam, integrated_gradients
from layerwise.explain.layers import LayerAnalysis, Probe, analyse_layers
from layerwise.explain.run import analyse_data, explain_inputs, layers_report_section, write_layers

__all__ = [
    "METHODS",
    "Attribution",
    "LayerAnalysis",
    "Probe",
    "analyse_data",
    "analyse_layers",
    "attribute",
    "explain_inputs",
    "grad_cam",
    "integrated_gradients",
    "layers_report_section",
    "write_layers",
]

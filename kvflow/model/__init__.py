"""Model code: paged attention, Llama-family layers, weight loading and packaged models.

Import the submodules directly (`kvflow.model.loader`, `kvflow.model.registry`, ...); this
package imports nothing so that `kvflow.model.attention` stays cheap to import.
"""

"""The bundled adapter trainer."""

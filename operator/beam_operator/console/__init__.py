"""The web console (docs/console.md): pages served by beam-api under /console."""

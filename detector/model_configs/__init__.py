"""open_clip architecture configs of the tiny DSKI backbones (JSON data, registered by ``detector.tiny``)."""

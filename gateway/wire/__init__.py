"""What crosses the wire: the codec for every payload in and out, the OpenAPI document, the
JSON functions socket.io uses."""

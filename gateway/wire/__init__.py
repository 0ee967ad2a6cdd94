"""What crosses the wire: the codec for every payload in and out, ApiError with its stable
codes, the OpenAPI document, the JSON functions socket.io uses."""

// Starts Swagger UI on the service's own OpenAPI document. A file, not an inline script,
// so that the page's Content-Security-Policy can forbid inline scripts.
"use strict";
(function () {
  const root = document.getElementById("swagger-ui");
  window.ui = window.SwaggerUIBundle({
    url: root.dataset.spec,
    domNode: root,
    deepLinking: true,
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // Requests made with "Try it out" carry the console's session cookie (same origin).
    withCredentials: true,
  });
})();

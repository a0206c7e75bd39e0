// The session's CSRF token (admin/csrf.py) on the requests the admin's scripts make: jQuery's
// (SQLAdmin's delete) and fetch (its CSV import). Forms carry it in a hidden field.
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf-token"]');
  if (!meta || !meta.content) {
    return;
  }
  var token = meta.content;
  var originalFetch = window.fetch;
  window.fetch = function (input, init) {
    var url = input instanceof Request ? input.url : String(input);
    if (new URL(url, window.location.href).origin === window.location.origin) {
      init = Object.assign({}, init);
      var headers = new Headers(init.headers || (input instanceof Request ? input.headers : undefined));
      headers.set("X-CSRF-Token", token);
      init.headers = headers;
    }
    return originalFetch.call(this, input, init);
  };
  if (window.jQuery) {
    window.jQuery.ajaxPrefilter(function (options, _original, xhr) {
      if (!options.crossDomain) {
        xhr.setRequestHeader("X-CSRF-Token", token);
      }
    });
  }
})();

// The delete dialog's reason (sqladmin/modals/delete.html): checked before SQLAdmin's own
// click handler (delegated on document, so it runs after this one on the button) and added
// to the URL it requests as ?reason=.
(function () {
  "use strict";
  var button = document.getElementById("modal-delete-button");
  var input = document.getElementById("modal-delete-reason");
  if (!button || !input) {
    return;
  }
  button.addEventListener("click", function (event) {
    var reason = input.value.trim();
    if (reason.length < 3) {
      input.classList.add("is-invalid");
      input.focus();
      event.stopPropagation();
      return;
    }
    input.classList.remove("is-invalid");
    var url = (button.getAttribute("data-url") || "").replace(/&reason=[^&]*$/, "");
    button.setAttribute("data-url", url + (url.indexOf("?") >= 0 ? "&" : "?") + "reason=" + encodeURIComponent(reason));
  });
  input.addEventListener("keydown", function (event) {
    if (event.key === "Enter") {
      event.preventDefault();
      button.click();
    }
  });
})();

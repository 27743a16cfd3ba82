// The one script of the admin page: the copy button next to a new key's secret.
document.addEventListener("click", function (event) {
  var button = event.target.closest("[data-copy]");
  if (!button) return;
  var text = document.getElementById(button.getAttribute("data-copy")).textContent;
  navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; },
                                           function () { button.textContent = "Select and copy"; });
});
